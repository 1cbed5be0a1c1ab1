"""Monte Carlo dropout: sampling modes, T-sample prediction with chunking and trunk caching,
and streaming statistics over samples."""

from dropkit.mc.mode import AttentionDropoutNotFoundWarning as AttentionDropoutNotFoundWarning
from dropkit.mc.mode import MCDropoutHandle as MCDropoutHandle
from dropkit.mc.mode import MCDropoutWarning as MCDropoutWarning
from dropkit.mc.mode import NoDropoutFoundWarning as NoDropoutFoundWarning
from dropkit.mc.mode import active_handle as active_handle
from dropkit.mc.mode import enable_mc_dropout as enable_mc_dropout
from dropkit.mc.mode import mc_dropout as mc_dropout
from dropkit.mc.plan import MCPlan as MCPlan
from dropkit.mc.sampling import DEFAULT_CPU_MEMORY_BUDGET as DEFAULT_CPU_MEMORY_BUDGET
from dropkit.mc.sampling import DEFAULT_MEMORY_BUDGET as DEFAULT_MEMORY_BUDGET
from dropkit.mc.sampling import default_memory_budget as default_memory_budget
from dropkit.mc.sampling import iter_mc_samples as iter_mc_samples
from dropkit.mc.sampling import last_plan as last_plan
from dropkit.mc.sampling import mc_predict as mc_predict
from dropkit.mc.streaming import MCSummary as MCSummary
from dropkit.mc.streaming import RunningMoments as RunningMoments
from dropkit.mc.trunk import TrunkSplit as TrunkSplit
from dropkit.mc.trunk import split_trunk as split_trunk

__all__ = [
    "AttentionDropoutNotFoundWarning",
    "DEFAULT_CPU_MEMORY_BUDGET",
    "DEFAULT_MEMORY_BUDGET",
    "MCDropoutHandle",
    "MCDropoutWarning",
    "MCPlan",
    "MCSummary",
    "NoDropoutFoundWarning",
    "RunningMoments",
    "TrunkSplit",
    "active_handle",
    "default_memory_budget",
    "enable_mc_dropout",
    "iter_mc_samples",
    "last_plan",
    "mc_dropout",
    "mc_predict",
    "split_trunk",
]
