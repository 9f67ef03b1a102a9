# Stage graph: data -> folds -> [pretrain] -> train -> features -> stack -> submit (+ lb).
# Every stage skips itself when its outputs are up to date, so `make submit` reruns only what changed.
#   make demo                              set up and run the whole chain on the bundled demo data
#   make test                              unit tests + end-to-end chain
#   make train CONFIG=configs/x.yaml ARGS="train.epochs=3" FOLDS=0,2
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
ARGS ?=
FOLDS ?=
FORCE ?=
RUN = $(PY) -m pipeline
FOLDS_ARG = $(if $(FOLDS),train.folds=[$(FOLDS)])
FLAGS = -c $(CONFIG) $(if $(FORCE),--force) $(ARGS)

.PHONY: setup demo data folds pretrain train features knn stack postprocess submit kaggle lb lb-plot lr-find tune test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

data: setup
	$(RUN) data $(FLAGS)

folds: data
	$(RUN) folds $(FLAGS)

# `make -j4 train` trains folds in parallel (one GPU each when several are visible); the last call
# finds every fold up to date and writes the summary (CV, curves, leaderboard row).
comma := ,
NGPU ?= $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)
N_SPLITS = $(shell $(RUN) config -c $(CONFIG) $(ARGS) --get folds.n_splits)
N_REPEATS = $(shell $(RUN) config -c $(CONFIG) $(ARGS) --get folds.repeats)
# folds.repeats: R x n_splits fold models, numbered over the repeats
FOLD_IDS = $(if $(FOLDS),$(subst $(comma), ,$(FOLDS)),$(shell seq 0 $$(( $(N_SPLITS) * $(N_REPEATS) - 1 ))))

# a round of pseudo-labelling or distillation first brings its teacher's features up to date
TEACHER_ARGS = $(filter-out name=% train.pseudo% train.distill% stack.%,$(ARGS))
train: folds
	@teachers=$$($(RUN) inputs --for train -c $(CONFIG) $(ARGS)) || exit 2; \
	for c in $$teachers; do $(MAKE) --no-print-directory features CONFIG=$$c ARGS="$(TEACHER_ARGS)" || exit 2; done
	@$(RUN) train --check $(FLAGS) $(FOLDS_ARG) 2>/dev/null || \
	  $(MAKE) --no-print-directory $(addprefix train-fold-,$(FOLD_IDS))
	$(RUN) train $(FLAGS) $(FOLDS_ARG)

train-fold-%:
	$(if $(filter-out 0,$(NGPU)),CUDA_VISIBLE_DEVICES=$$(( $* % $(NGPU) ))) $(RUN) train $(FLAGS) train.folds=[$*]

# jigsaw pretraining on all train + test images; then train with ARGS="model.init=models/pretrain/<name>-<backbone>.pt"
pretrain: data
	$(RUN) pretrain $(FLAGS)

lr-find: folds
	$(RUN) lr-find $(FLAGS)

# Optuna search over the config's `tune:` section; TRIALS in total over every worker of the study: run the
# same command on several machines (tune.storage=postgresql://...) or twice here to share the study
tune: folds
	$(RUN) tune $(FLAGS) $(if $(TRIALS),tune.trials=$(TRIALS))

features: train
	$(RUN) features $(FLAGS)

# nearest-neighbour class scores from the fold models' embeddings: features/<name>-knn/ (metric learning)
knn: train
	$(RUN) knn $(FLAGS)

# level 2 reads the features of stack.experiments (default: this config's own experiment): each is
# brought up to date first, with the config that defines it (`pipeline inputs` finds it by name)
stack: folds
	@inputs=$$($(RUN) inputs -c $(CONFIG) $(ARGS)) || exit 2; \
	for c in $$inputs; do case $$c in knn=*) t=knn; c=$${c#knn=};; *) t=features;; esac; \
	  $(MAKE) --no-print-directory $$t CONFIG=$$c ARGS="$(TEACHER_ARGS)" || exit 2; done
	$(RUN) stack $(FLAGS)

postprocess: setup
	$(RUN) postprocess $(FLAGS)

submit: setup
	$(RUN) submit $(FLAGS)

# an offline bundle for a Kaggle notebook: kaggle/<EXP>/ (wheels, checkpoints, level 2, rules, inference.ipynb);
# EXP = a feature set (experiment, stack or post-processed set), default: what `make submit` submits
kaggle: setup
	$(RUN) kaggle $(FLAGS) $(if $(EXP),kaggle.source=$(EXP))

# The whole chain on the bundled demo: two level-1 experiments, LightGBM level 2, submissions.
demo: setup
	$(MAKE) --no-print-directory features submit CONFIG=configs/demo.yaml ARGS="$(ARGS)"
	$(MAKE) --no-print-directory features submit CONFIG=configs/demo-small.yaml ARGS="$(ARGS)"
	$(MAKE) --no-print-directory stack submit CONFIG=configs/demo-stack.yaml ARGS="$(ARGS)"
	$(RUN) lb

test: setup
	$(PY) -m ruff check pipeline tests bench
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf folds/*.csv folds/*.json folds/*.yaml folds/*.png folds/*.txt models features/*/ submissions/*.csv

lb: setup
	$(RUN) lb $(ARGS)

lb-plot: setup
	$(RUN) lb plot $(if $(EXP),--experiment $(EXP)) $(ARGS)
