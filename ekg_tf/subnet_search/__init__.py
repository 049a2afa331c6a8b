"""EKG sub-network search: importance scoring, greedy search, durable state, memory bank."""
from ekg_tf.subnet_search.memory_bank import MemoryBank, build_memory_bank, select_teachers
from ekg_tf.subnet_search.objective import evaluate_logits, update_knowledge
from ekg_tf.subnet_search.otsu import trimmed_otsu
from ekg_tf.subnet_search.search import EKGSearch, SearchResult, SearchSettings

__all__ = ["EKGSearch", "MemoryBank", "SearchResult", "SearchSettings", "build_memory_bank",
           "evaluate_logits", "select_teachers", "trimmed_otsu", "update_knowledge"]
