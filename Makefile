# Every target sets up .venv itself (scripts/bootstrap.sh), so each works on a fresh machine.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test test-slow test-gpu gpu-check bench replicate toy-model lint

setup:
	bash scripts/bootstrap.sh

train: setup
	$(PY) examples/carve3d_train.py --output_dir outputs/tiny-carve3d

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The CUDA checks (tests/gpu, marked `gpu`): they skip, with the reason, on a machine without CUDA.
test-gpu: setup
	$(PY) -m pytest -q -rs -m gpu

# The prepared GPU check (set-up included, offline-tolerant, at most 8 minutes): results in GPU_CHECK_OUT, else in
# $OUT, else in gpu_check_results/ (see the top of the script).
GPU_CHECK_OUT ?=
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

bench: setup
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_sdxl.py

replicate: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_replication.py

# The single-view toy and the grid toy fine-tuned from it, then the view-batched toy fine-tuned from the single-view one.
toy-model: setup
	OMP_NUM_THREADS=1 $(PY) scripts/train_toy_model.py
	OMP_NUM_THREADS=1 $(PY) scripts/train_toy_view_batched.py

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
