"""Profiler: expert scores for a task from its demos, the selection of a pattern, and the profile file."""

from .criteria import CRITERIA, DEFAULT_CRITERION
from .demos import Demo, check_demos, demo_hash, load_demos
from .profile import PROFILE_FORMAT, Profile
from .run import ProfileRun, build_profile, collect_scores, profile_store, tokenize_demos
from .selection import POLICIES, Selection, best_routable, select

__all__ = [
    "CRITERIA",
    "DEFAULT_CRITERION",
    "POLICIES",
    "PROFILE_FORMAT",
    "Demo",
    "Profile",
    "ProfileRun",
    "Selection",
    "best_routable",
    "build_profile",
    "check_demos",
    "collect_scores",
    "demo_hash",
    "load_demos",
    "profile_store",
    "select",
    "tokenize_demos",
]
