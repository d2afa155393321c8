# `make test` and `make demo` create .venv and install the tested pins on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo quality benchmark benchmark_full_depth clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests

demo: venv
	DS_ACCELERATOR=$(ACCELERATOR) $(PYTHON) tools/demo.py

ACCELERATOR = $${DS_ACCELERATOR:-$$($(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}

# docs/results.md: every method x 2 seeds on the embedded task (about 25 minutes on 2 CPU cores)
quality: venv
	DS_ACCELERATOR=$(ACCELERATOR) $(PYTHON) tools/quality_table.py

# docs/benchmarks.md's measured table: LLaMA2-7B layer shapes, 2 layers, every method and the peer
benchmark: venv
	DS_ACCELERATOR=$(ACCELERATOR) $(PYTHON) tools/benchmark.py --model_config llama2-7b --num_layers 2 \
	  --methods full,lora,lisa,galore,owlore,lomo,adalomo,peer,peer_lisa --steps 6 --micro_batch_size 1 \
	  --block_size 256 --gradient_checkpointing --master_weights pure_bf16 --lisa_interval_steps 6 --output_dir bench_out

# docs/benchmarks.md's full-depth tables: owlore and lisa beside their peers, full AdamW predicted.
# LLaMA2-7B at all 32 layers, one process (13.5 GB of bf16 weights: a 24 GB machine holds it). K = 1:
# every step draws 5 new layers (the peers' kept state grows; a timeout or OOM is a row too);
# K = 50, the reference's: the steady-state speed. Each is one invocation; hours on a 2-core CPU.
FULL_DEPTH = --model_config llama2-7b --micro_batch_size 1 --block_size 128 --gradient_checkpointing \
	  --master_weights pure_bf16 --update_in_backward --lisa_activated_layers 5 --owl_nsamples 8

benchmark_full_depth: venv
	DS_ACCELERATOR=$(ACCELERATOR) $(PYTHON) tools/benchmark.py $(FULL_DEPTH) --methods owlore,lisa,peer,peer_lisa,full \
	  --predict_only full --steps 12 --warmup_steps_excluded 1 --lisa_interval_steps 1 --timeout_s 2400 \
	  --output_dir bench_full_depth_k1
	DS_ACCELERATOR=$(ACCELERATOR) $(PYTHON) tools/benchmark.py $(FULL_DEPTH) --methods owlore,peer,full \
	  --predict_only full --steps 6 --warmup_steps_excluded 2 --lisa_interval_steps 50 --output_dir bench_full_depth_k50

clean:
	rm -rf $(VENV) runs *.egg-info
