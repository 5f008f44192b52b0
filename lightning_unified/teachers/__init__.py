"""Where a dense signal's teacher (or the KL penalty's reference) runs when it is not a
Hugging Face model in the training process (``engine=hf``,
:mod:`lightning_unified.stages.teacher`, :mod:`lightning_unified.stages.reference`): a
frozen vLLM engine in the process (``vllm``) or an OpenAI-compatible server (``server``). Both return
:class:`~lightning_unified.teachers.scores.TeacherScores`: each response token's log-prob
and the teacher's top-k, the fields the loss already reads."""

from __future__ import annotations

from lightning_unified.teachers.scores import TeacherScores


def build_teacher(teacher, owner: str = "teacher", role: str = "teacher"):
    """The served model ``teacher`` (a :class:`~lightning_unified.specs.ServerTeacher` or
    :class:`~lightning_unified.specs.VLLMTeacher`) describes, not yet started; None for a
    model in process. ``owner`` names its settings in
    errors (``teacher``, ``signal.teachers.NAME`` or ``reference``); ``role`` is what it is
    to the run (a ``teacher``, or the KL penalty's ``reference``, which reads only each
    token's log-prob)."""
    from lightning_unified.specs import ServerTeacher, VLLMTeacher

    if isinstance(teacher, ServerTeacher):
        from lightning_unified.teachers.server import ServedTeacher

        return ServedTeacher(teacher.url, **teacher.server, owner=owner, role=role)
    if isinstance(teacher, VLLMTeacher):
        from lightning_unified.teachers.vllm import InProcessTeacher

        return InProcessTeacher(teacher.model.path, **teacher.vllm, owner=owner, role=role)
    return None


__all__ = ["TeacherScores", "build_teacher"]
