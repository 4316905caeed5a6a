# make ... VICTIM=tiny: a small BiLSTM (16 units) on the committed fixtures (682 Rotten Tomatoes
# snippets, 5,105 GloVe rows), 4 epochs, small searches: seconds per cell, for tests of the
# sweep machinery (tests/sweep.rs, scripts/slurm/test.sh). Not a result.
RAW_DATA := fixtures/rt-mini/raw.jsonl
GLOVE := fixtures/glove-mini
SOURCE_DEPS :=
EMB_SUFFIX := -mini
TOP_N := 2000
ATTACK_ARCH := lstm
DATA_SUFFIX := -mini
PREPARE_FLAGS :=
ORIGIN_FLAGS = --embeddings $(EMB)
BASE_DEPS :=
TRAIN_FLAGS := --epochs 4 --hidden 16
EARLY_EPOCHS := 1
HARDNESS_SEARCH := K=2 POSITIONS=2
BILEVEL_SEARCH := K=2 POSITIONS=1
ADV_SIZE := 16
CLEAN_PER_BATCH := 16
ETA := 0.03
DEMO_SEEDS := 2
DEMO_ROUNDS := 1
BILEVEL_ROUNDS := 1
# What a cell asks Slurm for besides CPUs (scripts/slurm/submit.sh).
SLURM_GRES := 
