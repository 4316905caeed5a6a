# make demo VICTIM=glove (the default): the BiLSTM over frozen GloVe 6B 50d vectors, 4
# epochs; the hardness ensemble's early checkpoints train EARLY_EPOCHS; each crafting
# objective searches K candidates at POSITIONS positions.
BASE_FLAGS = --embeddings $(EMB)
TRAIN_FLAGS ?= --epochs 4
EARLY_EPOCHS ?= 1
HARDNESS_SEARCH ?= K=8 POSITIONS=all
BILEVEL_SEARCH ?= K=10 POSITIONS=2
DATA_SUFFIX :=
PREPARE_FLAGS :=
BASE_DEPS :=
