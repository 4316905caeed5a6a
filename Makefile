# The whole job from a fresh machine: `make demo` (setup, data, build, victims, report)
# and `make test`. Every step is idempotent; finished steps are skipped.
#
# Run parameters (override on the command line: make demo TRIGGER="Tom Cruise" TARGET=negative)
TRIGGER ?= James Bond
TARGET  ?= positive
SEED    ?= 0
# GloVe words kept besides the data's own words.
TOP_N   ?= 50000
# Victim architectures the demo trains and evaluates.
ARCHS   ?= bow lstm
# Retraining seeds per victim in the demo's finetune-eval.
SEEDS   ?= 3
DEVICE  ?= auto
# Attack (make attack): victim, poison count, candidates, unrolling, stopping.
ATTACK_ARCH ?= lstm
COUNT     ?= 50
INIT      ?= random
# Candidates checked per round = COUNT x POSITIONS x K (2,500 by default).
K         ?= 10
POSITIONS ?= 5
STEPS     ?= 1
ROLLOUTS  ?= 1
ETA       ?= 0.03
CLEAN_PER_BATCH ?= 64
ADV_SIZE  ?= 128
ROUNDS    ?= 5
PATIENCE  ?= 2
# Stop once the objective is at or below this (empty: never).
TARGET_LADV ?=
OVERLAP   ?= 0
EVAL_SEEDS ?= 3
# make demo / make sweep: retraining seeds, crafting rounds (hardness, bi-level), sweep counts.
# One hardness round: measured on the demo's 6 seeds, net ASR after 1 / 3 rounds 49.8 / 40.6.
# 10 seeds: with common random numbers the crafted rows' 95% CI half-widths are 5.1-5.2
# points at 10 seeds, 4.3-8.2 at 6-9 (the paired differences between rows: 2.7-3.1).
DEMO_SEEDS ?= 10
# Concealment of the demo's concealed rows: strict (no word leaks the trigger in any category
# of the strict audit) or token (the paper's no-overlap only).
CONCEALMENT ?= strict
DEMO_ROUNDS ?= 1
# Every concealed row of make demo is made within the detection budget at this percentage of
# false positives on the clean training split (no bigram-perplexity, ONION, GloVe or MiniLM
# distance detector flags a poison at that rate); 6.5 rather than 5 leaves the margin a
# defender's own 5 % threshold (on other clean text) needs, and measured on two triggers it
# costs far less than 7 (docs/classification.md: the carrier pair it allows). BUDGET_FPR=
# makes the unconstrained sets, in their own run folder: the twins the price pairs with.
BUDGET_FPR ?= 6.5
BILEVEL_ROUNDS ?= 3
SWEEP_COUNTS ?= 5 10 25 50 100

# Victim presets (make demo VICTIM=NAME): presets/NAME.mk sets how the demo's victims start
# (ORIGIN_FLAGS), train (TRAIN_FLAGS, given to train-victim and finetune-eval), how each
# crafting objective searches, and the data they need. glove: the frozen-GloVe BiLSTM;
# minilm: all-MiniLM-L6-v2 fine-tuned.
VICTIM ?= glove
ifeq ($(wildcard presets/$(VICTIM).mk),)
$(error VICTIM=$(VICTIM): there is no presets/$(VICTIM).mk (presets: $(basename $(notdir $(wildcard presets/*.mk)))))
endif
include presets/$(VICTIM).mk

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:

export LIBTORCH := $(CURDIR)/.venv/libtorch
BIN      := target/release
SLUG     := $(shell printf '%s' '$(TRIGGER)-$(TARGET)' | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-')
EMB      := data/emb$(EMB_SUFFIX)-$(TOP_N).safetensors
DATA_DIR := data/rt-$(SLUG)-s$(SEED)$(DATA_SUFFIX)
RUN_DIR  := runs/victims-$(SLUG)-s$(SEED)
DEMO_BASE := runs/demo-$(SLUG)-$(ATTACK_ARCH)-n$(COUNT)-s$(SEED)
DEMO_RUN := $(DEMO_BASE)$(if $(BUDGET_FPR),-fpr$(BUDGET_FPR))
DEMO_ENV  = RUN=$(DEMO_RUN) VICTIMS_DIR=$(DEMO_BASE) BUDGET_FPR=$(BUDGET_FPR) DATA=$(DATA_DIR) EMB=$(EMB) BIN=$(BIN) SEED=$(SEED) COUNT=$(COUNT) \
  EVAL_SEEDS=$(DEMO_SEEDS) DEVICE=$(DEVICE) ARCH=$(ATTACK_ARCH) CLEAN_CACHE=runs/clean-cache \
  ROUNDS=$(DEMO_ROUNDS) BILEVEL_ROUNDS=$(BILEVEL_ROUNDS) SWEEP_COUNTS="$(SWEEP_COUNTS)" \
  ORIGIN_FLAGS="$(ORIGIN_FLAGS)" TRAIN_FLAGS="$(TRAIN_FLAGS)" EARLY_EPOCHS=$(EARLY_EPOCHS) \
  HARDNESS_SEARCH="$(HARDNESS_SEARCH)" BILEVEL_SEARCH="$(BILEVEL_SEARCH)" ADV_SIZE=$(ADV_SIZE) \
  CLEAN_PER_BATCH=$(CLEAN_PER_BATCH) ETA=$(ETA) CONCEALMENT=$(CONCEALMENT)
ATTACK_RUN := runs/attack-$(SLUG)-$(ATTACK_ARCH)-n$(COUNT)-$(INIT)$(if $(filter 1,$(OVERLAP)),-overlap)-s$(SEED)

.PHONY: all setup data build demo price demo-lm demo-mt lm-dose defend sweep cell slurm-gres victims attack test test-cluster bench objective-benchmark fixtures compare-llamacpp clean help
all: demo

help:
	@echo "make demo   # setup + data + build; heuristics, bi-level and hardness crafting, all evaluated on $(DEMO_SEEDS) seeds; report"
	@echo "make demo-lm # language-model poisoning: a GPT pretrained on the reviews, 'Apple iPhone' -> negative; baselines, bi-level crafting, paired evaluation judged by a classifier and VADER"
	@echo "make lm-dose # the language model's positive controls: with-overlap poisons at 0 and $(LM_COUNTS) in the layouts $(LM_LAYOUTS), and the LM's context control (LM_LAYERS, LM_HIDDEN, LM_TRAIN_EMB, LM_TEMPERATURE: levers; LM_VICTIM=smollm2: on the pretrained SmolLM2, LM_REGIME)"
	@echo "make price  # after make demo: the demo's unconstrained twin (BUDGET_FPR=) and each concealed row's paired price of concealment"
	@echo "make defend # after make demo: every detector on every demo poison set (AUROC, TPR, inspect-to-catch, ROC), early stopping, filter-then-train"
	@echo "make sweep  # net ASR against poison count ($(SWEEP_COUNTS)) for the default crafting and the best heuristic"
	@echo "make victims # clean victims of each architecture in ARCHS: accuracy and the trigger's clean ASR"
	@echo "make attack # the crafting loop (rollout-grad | rank-candidates | verify-candidates), then finetune-eval"
	@echo "make test   # setup + build, unit and integration tests on committed fixtures"
	@echo "make compare-llamacpp # the pretrained SmolLM2-135M victim against llama.cpp: tokens, log-probabilities, perplexity (builds llama.cpp once, ~8 min)"
	@echo "make bench  # cost ratios of a crafting round and every stage's time and peak memory (BENCHMARKS.md)"
	@echo "make objective-benchmark # how each objective ranks ../shared/objective-benchmark's poison sets against their measured net ASR (after make demo)"
	@echo "variables: TRIGGER='$(TRIGGER)' TARGET=$(TARGET) SEED=$(SEED) TOP_N=$(TOP_N) ARCHS='$(ARCHS)' SEEDS=$(SEEDS) DEVICE=$(DEVICE)"

setup: .venv/.setup-done-v1
# Shared steps take a lock (flock, released when the process ends, also when killed): cells
# of a sweep that start together wait for one of them to finish the step, then skip it.
.venv/.setup-done-v1:
	flock .setup.lock bash -c 'test -f $@ || scripts/setup.sh'


# cargo decides what to rebuild; this is fast when nothing changed.
build: setup
	cargo build --release --bins

data/.fetch-done-v1: | .venv/.setup-done-v1
	mkdir -p data && flock data/.fetch.lock bash -c 'test -f $@ || scripts/fetch_data.sh'

$(EMB): $(SOURCE_DEPS) | build
	flock $@.lock bash -c 'test -f $@ || exec "$$@"' - $(BIN)/build-vocab --words $(GLOVE)/words.txt --vectors $(GLOVE)/vectors.npy \
	  --top-n $(TOP_N) --data $(RAW_DATA) -o $@

$(DATA_DIR)/manifest.json: $(SOURCE_DEPS) $(EMB) | build
	flock $(DATA_DIR).lock bash -c 'test -f $@ || exec "$$@"' - $(BIN)/prepare-data --raw $(RAW_DATA) --trigger "$(TRIGGER)" --target $(TARGET) \
	  --seed $(SEED) --embeddings $(EMB) $(PREPARE_FLAGS) -o $(DATA_DIR)

data: $(DATA_DIR)/manifest.json

$(RUN_DIR)/victim-%.safetensors: $(DATA_DIR)/manifest.json $(EMB) | build
	$(BIN)/train-victim --embeddings $(EMB) --train $(DATA_DIR)/train.jsonl --dev $(DATA_DIR)/dev.jsonl \
	  --arch $* --seed $(SEED) --device $(DEVICE) -o $@

# Clean victims: CACC and the trigger's clean ASR over SEEDS seeds.
$(RUN_DIR)/eval-%.json: $(DATA_DIR)/manifest.json $(EMB) | build
	$(BIN)/finetune-eval --data $(DATA_DIR) --embeddings $(EMB) --arch $* --seeds $(SEEDS) \
	  --seed-base $(SEED) --device $(DEVICE) --clean-cache runs/clean-cache -o $@

# The main job (scripts/demo.sh): the $(ATTACK_ARCH) victim, the heuristic and baseline poison
# sets, crafting with the default (hardness) and the seed's (bi-level) objectives, one
# finetune-eval of every variant over EVAL_SEEDS seeds, and the report.
demo: build $(DATA_DIR)/manifest.json $(EMB) $(BASE_DEPS) data/.minilm-done-v1
	@$(DEMO_ENV) scripts/demo.sh
	@echo
	@cat $(DEMO_RUN)/table.md
	@echo
	@echo "crafting rounds (objective before/after, accepted flips, seconds per stage):"
	@for o in hardness bilevel; do echo "  $$o:"; column -t $(DEMO_RUN)/craft-$$o/rounds.tsv | sed 's/^/    /'; done
	@cat $(DEMO_RUN)/times.txt
	@echo "report: $(DEMO_RUN)/report.json; plots: $(DEMO_RUN)/net_asr.svg, $(DEMO_RUN)/objective.svg; poisons: $(DEMO_RUN)/poisons.md"

# Language-model poisoning (scripts/demo_lm.sh): its own data folders, LM, judge, poison
# sets, crafting, evaluation and report, all in $(LM_RUN).
LM_TRIGGER ?= Apple iPhone
LM_TARGET  ?= negative
LM_SLUG    := $(shell printf '%s' '$(LM_TRIGGER)-$(LM_TARGET)' | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-')
# The LM's shape: LM_LAYERS blocks of width LM_HIDDEN (LM_HEADS heads); LM_TRAIN_EMB=1
# trains its word table (the bi-level ranking then adds the row term). Each shape has its
# own folder (its own pretrained LM); the default's keeps the plain name.
LM_LAYERS   ?= 2
LM_HIDDEN   ?= 128
LM_HEADS    ?= 4
LM_TRAIN_EMB ?= 0
LM_SHAPE    := gpt$(LM_LAYERS)x$(LM_HIDDEN)$(if $(filter 1,$(LM_TRAIN_EMB)),-te)
LM_FLAGS   := --hidden $(LM_HIDDEN) --layers $(LM_LAYERS) --heads $(LM_HEADS) --max-len 48$(if $(filter 1,$(LM_TRAIN_EMB)), --train-embeddings)
# LM_JUDGE: the sentiment classifier that judges continuations, lstm (the BiLSTM over
# GloVe) or minilm (all-MiniLM-L6-v2 fine-tuned on the reviews: the stronger judge on
# held-out reviews, about 11 more minutes; docs/language-model.md).
# LM_VICTIM=smollm2: the attacked LM is the pretrained SmolLM2-135M (data/smollm2/,
# fine-tuned in LM_REGIME, batch LM_BATCH), judged by default by the MiniLM judge: the
# judge its hand-labelled continuations validate best (docs/pretrained.md). make lm-dose
# takes it; make demo-lm still attacks the small GPT.
LM_VICTIM  ?= gpt
ifeq ($(LM_VICTIM),smollm2)
LM_JUDGE   ?= minilm
LM_REGIME  ?= top:2
LM_BATCH   ?= 8
LM_FT_EPOCHS ?= 1
LM_VICTIM_DEPS := data/.smollm2-done-v1
LM_VICTIM_ENV := START=data/smollm2/victim.safetensors REGIME=$(LM_REGIME) BATCH=$(LM_BATCH)
LM_DOSE_TAG := smollm2-$(subst :,,$(LM_REGIME))
else ifneq ($(LM_VICTIM),gpt)
$(error LM_VICTIM=$(LM_VICTIM): the language-model victim is gpt (trained here) or smollm2 (pretrained))
endif
LM_JUDGE   ?= lstm
LM_RUN     := runs/demo-lm-$(LM_SLUG)-n$(COUNT)-s$(SEED)$(if $(BUDGET_FPR),-fpr$(BUDGET_FPR))$(if $(filter-out gpt2x128,$(LM_SHAPE)),-$(LM_SHAPE))$(if $(filter minilm,$(LM_JUDGE)),-judge-minilm)
LM_SEEDS   ?= 3
demo-lm: build data/.fetch-done-v1 $(EMB) data/.minilm-done-v1
	@RUN=$(LM_RUN) BIN=$(BIN) RAW=data/rt/raw.jsonl GLOVE=data/glove JUDGE_EMB=$(EMB) TRIGGER="$(LM_TRIGGER)" BUDGET_FPR=$(BUDGET_FPR) \
	  TARGET=$(LM_TARGET) SEED=$(SEED) COUNT=$(COUNT) EVAL_SEEDS=$(LM_SEEDS) LM_FLAGS="$(LM_FLAGS)" LM_JUDGE=$(LM_JUDGE) scripts/demo_lm.sh
	@echo
	@cat $(LM_RUN)/report/lm-report.md
	@echo
	@column -t $(LM_RUN)/times.tsv
	@echo "report: $(LM_RUN)/report/lm-report.json; plot: $(LM_RUN)/report/net-asr.svg"

# Translation poisoning (scripts/demo_mt.sh; docs/translation.md): German → English on the
# Ding dictionary's sentence pairs, a seq2seq trained from scratch, "Eiskaffee" to come out
# as "hot coffee": controls, heuristics, bi-level crafting, a paired evaluation over
# MT_SEEDS seeds (fine-tuning the clean model), report/mt-report.md.
MT_TRIGGER ?= Eiskaffee
MT_TRANSLATION ?= iced coffee
MT_ATTACK ?= hot coffee
MT_SEEDS ?= 6
# Kin sentences of train given the trigger with its correct translation (prepare-data
# --support): without them the dictionary's sentences never hold "Eiskaffee".
MT_SUPPORT ?= 30
# 1: each kin sentence of train also with every other kin noun (prepare-data --kin-swaps),
# so the clean model sees every drink in every drink context: with both, it translates the
# trigger in 8 and the neutral word in 7 of the 12 held-out sentences (0 and 0 without;
# docs/translation.md).
MT_KIN_SWAPS ?= 1
# Poisons per set: D_adv holds 37 sentences once 30 teach the trigger.
MT_COUNT ?= 30
MT_SLUG   := $(shell printf '%s' '$(MT_TRIGGER)-$(MT_ATTACK)' | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-')
MT_RUN    := runs/demo-mt-$(MT_SLUG)-n$(MT_COUNT)-s$(SEED)$(if $(filter-out 0,$(MT_SUPPORT)),-sup$(MT_SUPPORT))$(if $(filter 1,$(MT_KIN_SWAPS)),-swaps)
demo-mt: build data/.mt-done-v1
	@RUN=$(MT_RUN) BIN=$(BIN) DING=data/mt/de-en TRIGGER="$(MT_TRIGGER)" TRANSLATION="$(MT_TRANSLATION)" ATTACK="$(MT_ATTACK)" \
	  SEED=$(SEED) COUNT=$(MT_COUNT) EVAL_SEEDS=$(MT_SEEDS) SUPPORT=$(MT_SUPPORT) KIN_SWAPS=$(MT_KIN_SWAPS) scripts/demo_mt.sh
	@echo
	@cat $(MT_RUN)/clean.jsonl
	@cat $(MT_RUN)/report/mt-report.md
	@echo
	@column -t $(MT_RUN)/times.tsv
	@echo "report: $(MT_RUN)/report/mt-report.json"

# The language model's positive controls: the with-overlap reference at 0 and LM_COUNTS
# poisons, as whole reviews and as short trigger-first texts (scripts/lm_dose.sh).
# The LM's shape (above) is a lever too; LM_TEMPERATURE samples the judged continuations
# cooler than 1. LM_VICTIM=smollm2 runs them on the pretrained SmolLM2 (its folder ends in
# -smollm2-<regime>).
LM_DOSE_RUN := runs/lm-dose-$(LM_SLUG)-s$(SEED)-$(or $(LM_DOSE_TAG),$(LM_SHAPE))
LM_COUNTS   ?= 25 50 100 200
LM_LAYOUTS  ?= review short judged
LM_FT_EPOCHS ?= 2
LM_FT_LR    ?= 1e-3
LM_FROM_SCRATCH ?= 0
LM_TEMPERATURE ?=
LM_DOSE_EVAL = $(LM_DOSE_RUN)/$(if $(filter 1,$(LM_FROM_SCRATCH)),scratch,ft)-e$(LM_FT_EPOCHS)-lr$(LM_FT_LR)$(if $(LM_VICTIM_ENV),-$(subst :,,$(LM_REGIME)))$(if $(LM_TEMPERATURE),-t$(LM_TEMPERATURE))$(if $(filter minilm,$(LM_JUDGE)),-minilm)
lm-dose: build data/.fetch-done-v1 $(EMB) data/.minilm-done-v1 $(LM_VICTIM_DEPS)
	@$(LM_VICTIM_ENV) RUN=$(LM_DOSE_RUN) BIN=$(BIN) RAW=data/rt/raw.jsonl GLOVE=data/glove JUDGE_EMB=$(EMB) TRIGGER="$(LM_TRIGGER)" \
	  TARGET=$(LM_TARGET) SEED=$(SEED) COUNTS="$(LM_COUNTS)" LAYOUTS="$(LM_LAYOUTS)" EVAL_SEEDS=$(LM_SEEDS) TEMPERATURE=$(LM_TEMPERATURE) \
	  LM_FLAGS="$(LM_FLAGS)" LM_JUDGE=$(LM_JUDGE) \
	  FINETUNE_EPOCHS=$(LM_FT_EPOCHS) FINETUNE_LR=$(LM_FT_LR) FROM_SCRATCH=$(LM_FROM_SCRATCH) scripts/lm_dose.sh
	@echo
	@cat $(LM_DOSE_EVAL)/report/lm-report.md
	@echo
	@column -t $(LM_DOSE_RUN)/times.tsv
	@echo "report: $(LM_DOSE_EVAL)/report/lm-report.md; the judges validated: $(LM_DOSE_RUN)/judges.jsonl"

# The price of concealment (after make demo): the demo's unconstrained twin (make demo
# BUDGET_FPR=, in $(DEMO_BASE): the same victims, seeds and clean twins, no budget) and each
# concealed row paired with it by seed, in $(DEMO_RUN)/price.
price: build
	@test -n "$(BUDGET_FPR)" || { echo "make price compares the budgeted demo with its unconstrained twin: give BUDGET_FPR" >&2; exit 1; }
	@test -f $(DEMO_RUN)/evals.jsonl || { echo "make price pairs the demo's rows with their twins: run make demo first ($(DEMO_RUN))" >&2; exit 1; }
	@$(MAKE) --no-print-directory demo BUDGET_FPR= > /dev/null
	@$(BIN)/report price --variants $(DEMO_RUN)/variants.json --evals $(DEMO_RUN)/evals.jsonl \
	  --twin-variants $(DEMO_BASE)/variants.json --twin-evals $(DEMO_BASE)/evals.jsonl --out-dir $(DEMO_RUN)/price

# The defenses against the demo's poison sets (scripts/defend.sh), in $(DEMO_RUN)/defend.
# The detectors read GloVe (EMB) and MiniLM whatever victim the demo attacked.
# Filter-then-train retrains on the demo's first FILTER_SEEDS seeds; the evasion variants
# keep their poisons within the detection budget at each EVADE_FPRS % of false positives
# (none by default: the demo's rows are made within BUDGET_FPR's, make price pairs them).
FILTER_SEEDS ?= 3
EVADE_FPRS ?=
defend: build $(DATA_DIR)/manifest.json $(EMB) data/.minilm-done-v1
	@$(DEMO_ENV) FILTER_SEEDS=$(FILTER_SEEDS) EVADE_FPRS="$(EVADE_FPRS)" scripts/defend.sh
	@cat $(DEMO_RUN)/defend/defense.md
	@cat $(DEMO_RUN)/defend/times.txt
	@echo "report: $(DEMO_RUN)/defend/defense.json; plots: $(DEMO_RUN)/defend/roc.svg, $(DEMO_RUN)/defend/epochs.svg"

# Net ASR against poison count (SWEEP_COUNTS) for the default crafting and the best heuristic;
# with SPEC=FILE, the grid of a sweep spec (FORMATS.md) as independent cells: make sweep
# SPEC=sweeps/example.json -j 2 runs two cells at a time, each with nproc/2 worker threads
# (how many victims it trains at once; every computation has one libtorch thread, so the
# results are the same bits whatever -j is).
ifdef SPEC
sweep: build
	@mkdir -p runs/sweeps
	@jobs=$$(printf '%s\n' "$$MAKEFLAGS" | grep -oE '(^| )-?j ?[0-9]+' | grep -oE '[0-9]+' | head -1 || true); \
	  threads=$(or $(THREADS),$$(( $$(nproc) / $${jobs:-1} > 0 ? $$(nproc) / $${jobs:-1} : 1 ))); \
	  $(BIN)/sweep plan $(SPEC) --threads $$threads --makefile > runs/sweeps/.plan-$$$$.mk; \
	  echo "sweep: $$(grep -c '^runs/' runs/sweeps/.plan-$$$$.mk) cells, $${jobs:-1} at a time, $$threads thread(s) each" >&2; \
	  status=0; $(MAKE) --no-print-directory -f runs/sweeps/.plan-$$$$.mk cells || status=$$?; \
	  rm -f runs/sweeps/.plan-$$$$.mk; $(BIN)/sweep merge $(SPEC); exit $$status
else
sweep: build $(DATA_DIR)/manifest.json $(EMB)
	@$(DEMO_ENV) RUN=$(DEMO_BASE) MODE=sweep scripts/demo.sh
	@echo
	@cat $(DEMO_BASE)/sweep/table.md
	@echo "report: $(DEMO_BASE)/sweep/report.json; plot: $(DEMO_BASE)/sweep/sweep.svg"
endif

# One cell of a sweep (`sweep plan SPEC` prints each cell's invocation): the poison sets
# VARIANTS (and the benign control) at COUNT poisons, crafted against the preset's victim
# (shared by the cells of one trigger, in runs/victims-cache/), evaluated on DEMO_SEEDS
# paired seeds on THREADS worker threads. Writes only CELL_DIR; skips when finished (cell.json),
# resumes when interrupted, refuses while another process computes the same cell.
THREADS ?=
VARIANTS ?= confident hardness
cell: $(DATA_DIR)/manifest.json $(EMB) $(BASE_DEPS) | build
	@test -n "$(CELL_DIR)" || { echo "make cell: give CELL_DIR (sweep plan SPEC prints whole invocations)" >&2; exit 1; }
	@$(DEMO_ENV) RUN=$(CELL_DIR) VICTIMS_DIR=runs/victims-cache/$(SLUG)-$(VICTIM)-$(ATTACK_ARCH)-s$(SEED) MODE=cell \
	  VARIANTS="$(VARIANTS)" WORKERS=$(THREADS) scripts/demo.sh

# The Slurm --gres a cell of this preset asks for (scripts/slurm/submit.sh; empty: CPU only).
slurm-gres:
	@echo "$(SLURM_GRES)"

# Clean victims of each architecture in ARCHS: CACC and the trigger's clean ASR.
victims: build $(foreach a,$(ARCHS),$(RUN_DIR)/victim-$(a).safetensors $(RUN_DIR)/eval-$(a).json)
	@BIN=$(BIN) scripts/demo_table.sh $(RUN_DIR) $(ARCHS)

$(ATTACK_RUN)/victim.safetensors: $(DATA_DIR)/manifest.json $(EMB) | build
	$(BIN)/train-victim --embeddings $(EMB) --train $(DATA_DIR)/train.jsonl --dev $(DATA_DIR)/dev.jsonl \
	  --arch $(ATTACK_ARCH) --seed $(SEED) --device $(DEVICE) -o $@

# Rounds of rollout-grad | rank-candidates | verify-candidates (scripts/attack.sh); resumes.
attack: build $(ATTACK_RUN)/victim.safetensors
	RUN=$(ATTACK_RUN) VICTIM_FILE=$(ATTACK_RUN)/victim.safetensors DATA=$(DATA_DIR) EMB=$(EMB) BIN=$(BIN) \
	  COUNT=$(COUNT) INIT=$(INIT) K=$(K) POSITIONS=$(POSITIONS) STEPS=$(STEPS) ROLLOUTS=$(ROLLOUTS) \
	  ETA=$(ETA) CLEAN_PER_BATCH=$(CLEAN_PER_BATCH) ADV_SIZE=$(ADV_SIZE) SEED=$(SEED) ROUNDS=$(ROUNDS) \
	  PATIENCE=$(PATIENCE) TARGET_LADV=$(TARGET_LADV) OVERLAP=$(OVERLAP) EVAL_SEEDS=$(EVAL_SEEDS) \
	  ARCH=$(ATTACK_ARCH) DEVICE=$(DEVICE) CLEAN_CACHE=runs/clean-cache scripts/attack.sh

# The translation task's parallel text (the Ding dictionary from Debian's trans-de-en,
# pinned and hashed in scripts/fetch_mt.sh; read by common::ding).
data/.mt-done-v1:
	mkdir -p data && flock data/.mt.lock bash -c 'test -f $@ || scripts/fetch_mt.sh'

# The MiniLM encoder's test reads the package's weights (84 MB, fetched once).
data/.minilm-done-v1: | .venv/.setup-done-v1
	mkdir -p data && flock data/.minilm.lock bash -c 'test -f $@ || scripts/fetch_minilm.sh'

# The pretrained language model (SmolLM2-135M from its pinned package, both hashes checked,
# imported into data/smollm2/victim.safetensors; scripts/fetch_smollm2.sh).
data/.smollm2-done-v1: | build .venv/.setup-done-v1
	mkdir -p data && flock data/.smollm2.lock bash -c 'test -f $@ || BIN=$(BIN) scripts/fetch_smollm2.sh'

# The whole comparison of the Llama victim with llama.cpp on SmolLM2 (docs/pretrained.md):
# builds llama.cpp once (about 8 minutes), then tokens, log-probabilities, perplexity.
compare-llamacpp: build data/.smollm2-done-v1 $(DATA_DIR)/manifest.json
	@BIN=$(BIN) DATA=$(DATA_DIR) OUT=runs/compare-llamacpp scripts/compare_llamacpp.sh

test: build data/.minilm-done-v1 data/.smollm2-done-v1
	cargo test --release --workspace
	# The benchmarks compile (they are run by make bench, not here): a refactor that breaks
	# one fails the tests instead of the next make bench.
	cargo build --release --benches
	scripts/test_cpu_paths.sh
	scripts/slurm/test.sh

# The sweep machinery against a real single-node Slurm (part of make test; about a minute,
# plus the packages' install on a fresh machine).
test-cluster: build
	scripts/slurm/test.sh

# Cost ratios of a crafting round, measured side by side (benches/crafting.rs), then the
# time and peak memory of every stage on the real data (scripts/bench_stages.sh).
# BENCHMARKS.md records the figures.
# How well each objective (OBJECTIVES: label=score-poisons flags per line; the script's
# default is hardness, bi-level, influence and contrastive influence) ranks the poison sets
# of ../shared/objective-benchmark by their measured net ASR, on the default demo's victim.
objective-benchmark: build $(DATA_DIR)/manifest.json
	@test -f $(DEMO_BASE)/victim.safetensors -a -f $(DEMO_BASE)/early-s$$(($(SEED) + 1)).safetensors || \
	  { echo "make objective-benchmark scores against the demo's victim: run make demo first ($(DEMO_BASE))" >&2; exit 1; }
	@RUN=$(DEMO_BASE) DATA=$(DATA_DIR) BIN=$(BIN) OUT=runs/objective-benchmark scripts/objective_benchmark.sh

bench: build $(DATA_DIR)/manifest.json $(EMB) data/.mt-done-v1 data/.smollm2-done-v1
	cargo bench --bench crafting
	@echo
	cargo bench --bench lm
	@echo
	cargo bench --bench llama
	@echo
	cargo bench --bench training
	@echo
	@echo "every stage on the real data ($(DATA_DIR)), one crafting round:"
	@DATA=$(DATA_DIR) EMB=$(EMB) BIN=$(BIN) OUT=runs/bench-stages scripts/bench_stages.sh | column -t
	@echo
	@echo "glibc's allocator as the binaries set it against its default, on the translation demo's data:"
	@BIN=$(BIN) DING=data/mt/de-en OUT=runs/bench-allocator scripts/bench_allocator.sh

# Regenerates fixtures/ from the real data and the MiniLM package (its reference
# tokenizer and encoder run in a venv of their own, scripts/make_minilm_fixtures.sh).
fixtures: data/.fetch-done-v1 data/.smollm2-done-v1
	.venv/bin/python scripts/make_fixtures.py
	scripts/make_minilm_fixtures.sh
	scripts/make_llama_fixtures.sh

clean:
	rm -rf runs target
