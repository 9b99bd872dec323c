"""The embedded demo (the default of `python run.py`): the whole method, offline, on a laptop CPU.

Generated multi-step arithmetic word problems (motab_jax/pipeline/demo_data.py: a running total over 3 to 6 days,
one step per day). The teacher and the student are small Qwen3-shaped models with the built-in byte-level tokenizer,
shipped in configs/demo_models/ (see its README). Both have the same architecture and initialisation and differ only
in what they were trained on: the teacher on the correct solutions (and on going on from the right total after a
wrong step, so it does not take a wrong total on trust), the student on solutions written with one systematic
misconception (it forgets a carry when the units digits add up to 15 or more, and the matching borrow). So the
teacher solves all held-out problems and the student about half (58%), and the student's errors are local: one
wrong step, which the later steps carry on. The job runs MOTAB and teacher-only synthesis on 256 problems, SFT
of the student on each, and the evaluation of the four models on 100 held-out problems.

The shipped models are the output of this repository's `pretrain` stage (pretraining is not the method, and it costs
more than the rest of the demo on 2 CPU cores, so it is not redone on every run). Remake them with

    python run.py --config=configs/demo.py:pretrain
    cp runs/demo_pretrain/pretrain/teacher/hf/* configs/demo_models/teacher/   # likewise the student

(the same recipe on another machine gives other bits, not another kind of model: XLA's CPU kernels round
differently with the thread count and instruction set). They were pretrained on the pretrain split of data seed 0,
which `write_demo_data` keeps disjoint from seed 0's synthesis and held-out problems: with another `seed` the
held-out problems may include ones the models were pretrained on.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from configs import base

DEMO_MODELS = Path(__file__).resolve().parent / "demo_models"
# (layers, width, init seed) of the randomly initialised models the pretrain recipe starts from: one initialisation,
# so the teacher and the student differ only in their training data.
SHAPES = {"teacher": (2, 128, 2), "student": (2, 128, 2)}


def _tiny(num_layers: int, hidden_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        model_type="qwen3", vocab_size=384, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=hidden_size // 4, qk_norm=True,
        bos_token_id=259, eos_token_ids=(260,), pad_token_id=259))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The demo job; `variant` "pretrain" (`--config=configs/demo.py:pretrain`): the recipe of the shipped models."""
    if variant not in ("", "pretrain"):
        raise ValueError(f"configs/demo.py:{variant}: accepted variants: '' (the demo) and 'pretrain'")
    config = base.get_config()
    config.run_dir = "runs/demo"
    for name, (layers, width, seed) in SHAPES.items():
        spec = config[name]
        spec.path = str(DEMO_MODELS / name)
        spec.tokenizer = "byte_level"
        spec.dtype = "float32"
        spec.seed = seed
        spec.init = _tiny(layers, width)
    config.stages = "synthesize,sft,eval"
    config.policies = "motab,teacher_only"
    config.data.questions = "demo"
    # 256 synthesis questions and 100 held-out ones; the pretrain split (3200, disjoint from both: the generator has
    # 4176 distinct solutions) is what the shipped models learned the task from.
    config.data.demo_train = 256
    config.data.demo_held_out = 100
    config.data.demo_pretrain = 3200
    s = config.synthesis
    # A solution is at most 127 tokens and a prompt 173; a step ("Day 3: 63+9=72.\n\n") 15 to 18.
    s.samples_per_question, s.num_slots, s.traj_cap, s.step_cap = 1, 32, 160, 32
    s.teacher_min_budget, s.max_prompt_len, s.max_steps, s.draft_len = 160, 192, 12, 8
    # The boundary's scale for byte-level steps. A slip is one wrong digit among the ~16 bytes of a step, so the step's
    # geometric-mean teacher probability V_T is about 0.45-0.65 (median 0.53), a right step's ~1.0, and the teacher's
    # entropy before a step ~0 (eps = eps0). The step after a slip that passed starts from the wrong total, which the
    # teacher (trained to recompute it, demo_data.recovery_example) marks down to about 0.35-0.7. Measured on the
    # demo's 256 synthesis problems (not the held-out ones): at 0.55 three slips in four breach where they happen, 9
    # more one step later (backtracking then finds the slip: t* < t) and 13 of 98 pass unseen; at 0.5 t* < t in 8
    # breaches but 72 slips pass; at 0.6 or more nearly every slip breaches where it happens (t* = t). The paper's
    # eps0 = 0.2 (useful range 0.1-0.5) is a scale for BPE steps whose tokens each carry more.
    s.eps0 = 0.55
    s.output_path = ""
    config.sft.update(dict(learning_rate=3e-4, min_learning_rate=3e-5, warmup_ratio=0.1, epochs=4,
                           global_batch_size=16, seq_len=352, cutoff_len=352, save_every=1000, chunk_size=176))
    config.eval.update(dict(benchmarks="demo", samples=1, temperature=0.0, max_new_tokens=160, batch_size=50))
    # On-policy KD is not in the demo's stages; these sizes make `--config.stages=synthesize,sft,kd,eval` fit it.
    config.kd.update(dict(max_new_tokens=160, seq_len=352, prompts_per_step=8, samples_per_prompt=2, epochs=1,
                          learning_rate=1e-4, min_learning_rate=1e-5, chunk_size=176))
    # The recipe of configs/demo_models: both models from random initialisation on the 3200 pretrain problems, 16 per
    # step (a row is at most 301 tokens), the teacher on the correct solutions, the student on its misconception's.
    # The teacher also reads half the problems once more with one day written wrong (not trained on) and the correct
    # rest (trained on), so it recomputes the running total rather than copying it (demo_data.recovery_example).
    for role, epochs in (("teacher", 5), ("student", 5)):
        config.pretrain[role] = ml_collections.ConfigDict(dict(
            epochs=epochs, learning_rate=3e-3, min_learning_rate=3e-4, seq_len=320, cutoff_len=320, save_every=100,
            target="solution" if role == "teacher" else "student_solution",
            recovery=0.5 if role == "teacher" else 0.0))
    if variant == "pretrain":
        config.run_dir = "runs/demo_pretrain"
        config.stages = "pretrain,eval"
        for name in SHAPES:
            config[name].path = ""
    return config
