"""Statistics core of lmfuse.proteus (numpy/scipy only): limma-style moderated statistics,
two-sample tests, BH, enrichment (ORA, pre-ranked GSEA), clustering, survival, correlation,
preprocessing."""

from .cluster import adjusted_rand, bootstrap_stability, hierarchical, kmeans, pca, silhouette
from .correlation import coabundance_modules, correlate_rows, correlation_global_permutation_p, module_eigengene
from .enrich import gsea_prerank, hypergeom_sf, ora, read_gmt, write_gmt
from .limma import LinearFit, fit_f_dist, lm_fit, moderated_f, moderated_t, squeeze_var, trigamma_inverse
from .multitest import bh
from .preprocess import (impute_knn, impute_minprob, log2_transform, median_normalize, quantile_normalize,
                         valid_value_mask)
from .survival import (concordance_index, cox_fit, cox_global_permutation_p, cox_score_test, kaplan_meier, logrank,
                       logrank_scores, median_survival, ph_test)
from .tests import mann_whitney, welch

__all__ = [n for n in dir() if not n.startswith("_")]
