"""The embedded demo (the default of `python run.py`): the whole method, offline, on a laptop CPU.

Generated multi-step arithmetic word problems; a small teacher and a smaller, less trained student
(Qwen3-shaped, the built-in byte-level tokenizer) are first trained by the pipeline itself on the
problems' step-by-step solutions; then MOTAB and teacher-only synthesis, SFT of the student on each, and
evaluation on held-out problems.
"""

from __future__ import annotations

import ml_collections

from configs import base


def _tiny(num_layers: int, hidden_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        model_type="qwen3", vocab_size=384, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=hidden_size // 4, qk_norm=True,
        bos_token_id=259, eos_token_ids=(260,), pad_token_id=259))


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.run_dir = "runs/demo"
    for name, (layers, width, seed) in {"teacher": (4, 128, 1), "student": (2, 64, 2)}.items():
        spec = config[name]
        spec.tokenizer = "byte_level"
        spec.dtype = "float32"
        spec.seed = seed
        spec.init = _tiny(layers, width)
    config.stages = "pretrain,synthesize,sft,eval"
    config.policies = "motab,teacher_only"
    config.data.questions = "demo"
    # The models learn the task from 4096 generated solutions (disjoint from the 256 synthesis questions and the
    # 100 held-out ones): enough for the teacher to learn the arithmetic, not for the smaller, shorter-trained
    # student.
    config.data.demo_train = 256
    config.data.demo_held_out = 100
    config.data.demo_pretrain = 4096
    s = config.synthesis
    s.samples_per_question, s.num_slots, s.traj_cap, s.step_cap = 1, 32, 96, 48
    s.teacher_min_budget, s.max_prompt_len, s.max_steps, s.draft_len = 32, 192, 16, 8
    s.output_path = ""
    config.sft.update(dict(learning_rate=3e-4, min_learning_rate=3e-5, warmup_ratio=0.1, epochs=8,
                           global_batch_size=16, seq_len=320, cutoff_len=320, save_every=1000, chunk_size=160))
    # The teacher trains 3 epochs, the (smaller) student 1 at a lower rate, so the student is the weaker model.
    config.pretrain.teacher = ml_collections.ConfigDict(dict(epochs=3, learning_rate=3e-3, min_learning_rate=3e-4))
    config.pretrain.student = ml_collections.ConfigDict(dict(epochs=1, learning_rate=1e-3, min_learning_rate=3e-4))
    config.eval.update(dict(benchmarks="demo", samples=1, temperature=0.0, max_new_tokens=96, batch_size=40))
    return config
