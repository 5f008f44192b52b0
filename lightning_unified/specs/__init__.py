"""What a run is made of: the ``data_source`` and ``signal`` specs, one file per config group.

Plain dataclasses, so Hydra instantiates them from ``conf/data_source/*.yaml`` and
``conf/signal/*.yaml`` and Python users construct them directly. Each checks its own
settings where it is built; every rule that relates two settings is in
:mod:`lightning_unified.rules`. A method is one ``data_source`` combined with one ``signal``
(:class:`Method`); the module builds its stages from them (:mod:`lightning_unified.pipeline`).

=====================  ==============================================================
``model.py``           :class:`ModelRef`: a model's directory and loading options
``sampling.py``        :class:`Sampling`: the rollout engine and the distribution
``importance.py``      :class:`Importance`: the ratio that corrects for the sampler
``environment.py``     :class:`Environment`: multi-turn episodes
``data_source.py``     :class:`OffPolicy`, :class:`OnPolicy` (mixed: ``probability`` < 1)
``rewards.py``         :class:`Reward`
``teacher.py``         the six kinds of teacher, a tagged union
``signal.py``          :class:`Sparse`, :class:`Dense`, :class:`Preference`, :class:`RewardPairs`
``reference.py``       :class:`Reference`: the KL penalty's reference
``method.py``          :class:`Method`: the three together, as the rules read them
``validation.py``      :class:`Validation`: k sampled answers per held-out prompt (pass@k)
=====================  ==============================================================
"""

from lightning_unified.specs.data_source import OffPolicy, OnPolicy
from lightning_unified.specs.environment import Environment
from lightning_unified.specs.importance import Importance
from lightning_unified.specs.method import Method, loss_temperature
from lightning_unified.specs.model import LOAD_OPTIONS, ModelRef
from lightning_unified.specs.reference import KL_ESTIMATORS, TOKENIZER_MODES, Reference
from lightning_unified.specs.rewards import Reward, as_rewards
from lightning_unified.specs.sampling import BEHAVIOURS, ENGINES, Sampling
from lightning_unified.specs.signal import PREFERENCE_LOSSES, TOPK_TAILS, Dense, Preference, RewardPairs, Sparse
from lightning_unified.specs.teacher import (
    SELF_TEACHER,
    SELF_TEACHER_UPDATES,
    TEACHER_ENGINES,
    TEACHER_KINDS,
    CachedTeacher,
    HFTeacher,
    SelfTeacher,
    ServerTeacher,
    SeveralTeachers,
    TeacherEntry,
    TeacherSource,
    VLLMTeacher,
    teacher_entry,
)
from lightning_unified.specs.validation import Validation

__all__ = [
    "BEHAVIOURS", "ENGINES", "KL_ESTIMATORS", "LOAD_OPTIONS", "PREFERENCE_LOSSES", "SELF_TEACHER",
    "SELF_TEACHER_UPDATES", "TEACHER_ENGINES", "TEACHER_KINDS", "TOKENIZER_MODES", "TOPK_TAILS", "CachedTeacher",
    "Dense", "Environment", "HFTeacher", "Importance", "Method", "ModelRef", "OffPolicy", "OnPolicy", "Preference",
    "Reference", "Reward", "RewardPairs", "Sampling", "SelfTeacher", "ServerTeacher", "SeveralTeachers", "Sparse",
    "TeacherEntry", "TeacherSource", "VLLMTeacher", "Validation", "as_rewards", "loss_temperature", "teacher_entry",
]
