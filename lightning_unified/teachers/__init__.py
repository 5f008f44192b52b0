"""Where a dense signal's teacher runs when it is not a Hugging Face model in the training
process (``teacher.engine=hf``, :mod:`lightning_unified.callbacks.teacher`): a frozen vLLM
engine in the process (``vllm``) or an OpenAI-compatible server (``server``). Both return
:class:`~lightning_unified.teachers.scores.TeacherScores`: each response token's log-prob
and the teacher's top-k, the fields the loss already reads."""

from __future__ import annotations

from lightning_unified.teachers.scores import TeacherScores


def build_teacher(teacher, owner: str = "teacher"):
    """The served teacher ``teacher`` (a :class:`~lightning_unified.specs.Teacher`)
    describes, not yet started; None for ``engine=hf``. ``owner`` names its settings in
    errors (``teacher``, or ``signal.teachers.NAME``)."""
    if teacher.engine == "server":
        from lightning_unified.teachers.server import ServedTeacher

        return ServedTeacher(teacher.url, **teacher.server, owner=owner)
    if teacher.engine == "vllm":
        from lightning_unified.teachers.vllm import InProcessTeacher

        return InProcessTeacher(teacher.path, **teacher.vllm, owner=owner)
    return None


__all__ = ["TeacherScores", "build_teacher"]
