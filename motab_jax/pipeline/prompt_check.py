"""One prompt convention per model, checked before a job runs.

Who renders which prompt:
* synthesis with one vocabulary: both models read ONE token sequence, the question rendered by the teacher's
  tokenizer (its chat template); the records keep it as `prompt` (what SFT trains the student on) and
  `teacher_prompt` (equal). On-policy KD (one vocabulary only) prompts the student the same way.
* synthesis across vocabularies: each model reads its own tokenizer's rendering; the records keep both
  (`prompt`: the student's, `teacher_prompt`: the teacher's).
* evaluation: every model is prompted with its own tokenizer's rendering.

So with one vocabulary and two different chat templates, the student is trained on the teacher's template and
evaluated on its own. `check_prompt_convention` renders the first questions of the job with both tokenizers
and reports the first differing character: a warning for a one-vocabulary pair, an info line otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

from motab_jax.jsonl import read_jsonl
from motab_jax.text import VocabularyMismatchError, check_shared_vocabulary
from motab_jax.text.prompts import question_prompt

log = logging.getLogger("motab_jax")

PREVIEW_QUESTIONS = 3  # how many of the job's first questions the preflight renders
_CONTEXT_CHARS = 24  # characters shown on each side of the first difference


@dataclasses.dataclass(frozen=True)
class PromptDifference:
    """Where two renderings of the same question first differ."""

    question: int  # index among the compared questions
    position: int  # first differing character (the shorter one's length when it is a prefix of the other)
    student: str  # the student's rendering around `position`
    teacher: str  # the teacher's rendering around `position`

    def describe(self) -> str:
        return (f"question {self.question}, first difference at character {self.position}: student "
                f"{self.student!r} vs teacher {self.teacher!r}")


def first_difference(a: str, b: str) -> int | None:
    """Index of the first character where `a` and `b` differ (the shorter length if one is a prefix of the
    other); None when they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare_rendered_prompts(student_tokenizer: Any, teacher_tokenizer: Any, questions: Sequence[str], *,
                             instruction: str = "", prompt_format: str = "chat",
                             teacher_prompt_format: str = "") -> PromptDifference | None:
    """The first question the two tokenizers render differently (`text.prompts.question_prompt`, the renderer
    synthesis, KD and evaluation use), and where; None when every question renders identically."""
    for index, question in enumerate(questions):
        student, _ = question_prompt(student_tokenizer, question, instruction, prompt_format=prompt_format)
        teacher, _ = question_prompt(teacher_tokenizer, question, instruction,
                                     prompt_format=teacher_prompt_format or prompt_format)
        position = first_difference(student, teacher)
        if position is not None:
            start = max(0, position - _CONTEXT_CHARS)
            return PromptDifference(index, position, student[start:position + _CONTEXT_CHARS],
                                    teacher[start:position + _CONTEXT_CHARS])
    return None


def preview_questions(config: Any, n: int = PREVIEW_QUESTIONS) -> tuple[str, list[str]]:
    """(where they come from, the texts of) the job's first `n` synthesis questions, read without downloading
    anything: the demo's generated problems, a local file's first questions, else the models' probe prompt."""
    d = config.data
    questions = str(d.questions)
    if questions == "demo":
        from motab_jax.pipeline.demo_data import write_demo_data

        with tempfile.TemporaryDirectory() as folder:  # the first problems do not depend on the split sizes
            path = write_demo_data(folder, train=n, held_out=0, seed=config.seed)["train"]
            return "the demo's first problems", [row["problem"] for row in read_jsonl(path)]
    path = Path(questions).expanduser()
    if questions and not questions.startswith(("hf:", "tfds:")) and path.is_file():
        if d.question_fields:
            from motab_jax.data import read_examples

            fields = tuple(f.strip() for f in str(d.question_fields).split(","))
            examples, _ = read_examples(str(path), fields=fields, limit=n)  # type: ignore[arg-type]
            texts = [e.prompt if isinstance(e.prompt, str) else e.prompt[-1]["content"] for e in examples]
        else:
            from motab_jax.data.questions import read_questions

            texts = [str(q.get("problem", q.get("question", q.get("prompt", "")))) for q in read_questions(path, n)]
        if texts:
            return f"the first questions of {path}", texts
    return "the probe prompt (models.probe_prompt; the questions are not read before the job)", \
        [str(config.models.probe_prompt)]


def check_prompt_convention(config: Any, teacher_tokenizer: Any, student_tokenizer: Any) -> PromptDifference | None:
    """Renders the job's first questions with both tokenizers as synthesis would (`synthesis.instruction`,
    `prompt_format`, `teacher_prompt_format`) and logs the outcome; returns the first difference, if any."""
    source, questions = preview_questions(config)
    s = config.synthesis
    try:
        check_shared_vocabulary(teacher_tokenizer, student_tokenizer)
        shared = True
    except VocabularyMismatchError:
        shared = False
    try:
        difference = compare_rendered_prompts(student_tokenizer, teacher_tokenizer, questions,
                                              instruction=s.instruction, prompt_format=s.prompt_format,
                                              teacher_prompt_format="" if shared else s.teacher_prompt_format)
    except Exception as e:  # noqa: BLE001 - e.g. a tokenizer without a chat template: synthesis reports it
        log.warning("preflight: could not render %s with both tokenizers (%s: %s)", source, type(e).__name__, e)
        return None
    if difference is None:
        log.info("preflight: the student's and the teacher's tokenizers render %s identically (prompt_format=%s)",
                 source, s.prompt_format)
    elif shared:
        log.warning(
            "preflight: the student's and the teacher's chat templates render %s differently (%s). With one "
            "vocabulary, synthesis and on-policy KD prompt both models with the teacher's rendering (the records' "
            "prompt = teacher_prompt), so the student is trained on the teacher's template but evaluated on its own. "
            "Harmless if the difference is, e.g., a default system prompt; otherwise give both models one chat "
            "template (the chat_template in one model's tokenizer files).", source, difference.describe())
    else:
        log.info("preflight: across vocabularies each model is prompted with its own tokenizer's rendering (the "
                 "records keep both: prompt, teacher_prompt); on %s: %s", source, difference.describe())
    return difference
