"""The paper's printed numbers (paper.md §7) and the readings chosen where it is ambiguous (§9). Data only.

Errors and success rates are fractions; ``av_distortion`` / ``av_min_distortion`` are RMS pixel changes
(pixels in [0, 1]). Table 2 and 4 rows map the column model to the error of that model on the row's set.
"""

PAPER_TABLE1 = {
    "FC10(10^-4)": {"train_error": 0.067, "test_error": 0.074, "av_min_distortion": 0.062},
    "FC10(10^-2)": {"train_error": 0.10, "test_error": 0.094, "av_min_distortion": 0.1},
    "FC10(1)": {"train_error": 0.212, "test_error": 0.20, "av_min_distortion": 0.14},
    "FC100-100-10": {"train_error": 0.0, "test_error": 0.0164, "av_min_distortion": 0.058},
    "FC200-200-10": {"train_error": 0.0, "test_error": 0.0154, "av_min_distortion": 0.065},
    "AE400-10": {"train_error": 0.0057, "test_error": 0.019, "av_min_distortion": 0.086},
}
_T2_COLS = ("FC10(10^-4)", "FC10(10^-2)", "FC10(1)", "FC100-100-10", "FC200-200-10", "AE400-10")
PAPER_TABLE2 = {  # row (examples made for / noise) -> column model -> error; "av_distortion".
    "FC10(10^-4)": dict(zip(_T2_COLS, (1.0, 0.117, 0.227, 0.02, 0.039, 0.027)), av_distortion=0.062),
    "FC10(10^-2)": dict(zip(_T2_COLS, (0.871, 1.0, 0.352, 0.359, 0.273, 0.098)), av_distortion=0.1),
    "FC10(1)": dict(zip(_T2_COLS, (0.719, 0.762, 1.0, 0.481, 0.47, 0.344)), av_distortion=0.14),
    "FC100-100-10": dict(zip(_T2_COLS, (0.289, 0.137, 0.211, 1.0, 0.066, 0.02)), av_distortion=0.058),
    "FC200-200-10": dict(zip(_T2_COLS, (0.382, 0.14, 0.238, 0.203, 1.0, 0.027)), av_distortion=0.065),
    "AE400-10": dict(zip(_T2_COLS, (0.234, 0.16, 0.248, 0.094, 0.066, 1.0)), av_distortion=0.086),
    "noise:0.1": dict(zip(_T2_COLS, (0.05, 0.101, 0.183, 0.0, 0.0, 0.008)), av_distortion=0.1),
    "noise:0.3": dict(zip(_T2_COLS, (0.156, 0.113, 0.227, 0.05, 0.043, 0.031)), av_distortion=0.3),
}
PAPER_TABLE3 = {
    "FC100-100-10": {"error_p1": 0.0, "error_p2": 0.024, "error_test": 0.02, "min_av_distortion": 0.062},
    "FC123-456-10": {"error_p1": 0.0, "error_p2": 0.025, "error_test": 0.021, "min_av_distortion": 0.059},
    "FC100-100-10'": {"error_p1": 0.023, "error_p2": 0.0, "error_test": 0.021, "min_av_distortion": 0.058},
}
_T4_COLS = ("FC100-100-10", "FC123-456-10", "FC100-100-10'")
PAPER_TABLE4 = {  # row -> column -> error; "av_distortion" is the row's stddev as printed.
    "FC100-100-10": dict(zip(_T4_COLS, (1.0, 0.262, 0.059)), av_distortion=0.062),
    "FC123-456-10": dict(zip(_T4_COLS, (0.0625, 1.0, 0.051)), av_distortion=0.059),
    "FC100-100-10'": dict(zip(_T4_COLS, (0.082, 0.082, 1.0)), av_distortion=0.058),
    "noise:upper": dict(zip(_T4_COLS, (0.022, 0.026, 0.024)), av_distortion=0.06),
    "magnified:FC100-100-10": dict(zip(_T4_COLS, (1.0, 0.98, 0.43)), av_distortion=0.1),
    "magnified:FC123-456-10": dict(zip(_T4_COLS, (0.96, 1.0, 0.22)), av_distortion=0.1),
    "magnified:FC100-100-10'": dict(zip(_T4_COLS, (0.27, 0.50, 1.0)), av_distortion=0.1),
    "noise:lower": dict(zip(_T4_COLS, (0.026, 0.028, 0.027)), av_distortion=0.1),
}
PAPER = {"table1": PAPER_TABLE1, "table2": PAPER_TABLE2, "table3": PAPER_TABLE3, "table4": PAPER_TABLE4}

# The Table 1 models of one architecture, by increasing weight decay lambda (Table 1 claim).
LAMBDA_ORDER = ("FC10(10^-4)", "FC10(10^-2)", "FC10(1)")

# The readings chosen where the paper is ambiguous (paper.md §9), stated in every report.
READINGS = (
    "A1-A4 (attack): box-constrained L-BFGS on c*||r||^2 + CE(x+r, l) with a line search for the largest c "
    "whose minimiser is classified as l (intriguing_jax.attack.lbfgs_attack); success re-checked by argmax.",
    "A5 (targets): one target per example, uniform over the 9 wrong labels, seeded; the same targets for "
    "every model, so the rows of Tables 2 and 4 attack the same (image, target) pairs.",
    "A6 (examples): Tables 1-2 attack the training set, Tables 3-4 the test set; a seeded random subset when "
    "num_examples is smaller than the set (default: the whole set). Distortions are averaged over all "
    "attacked examples; the average over the examples the model originally classified correctly is also "
    "given.",
    "A7 (failures): attack failures are kept and reported (success rate, diagonal below 100%).",
    "A8 (distortion): per-example RMS pixel change sqrt(mean((x'-x)^2)) over the 784 pixels in [0,1], then "
    "averaged over examples.",
    "A9 (error metric): plain error rate of the evaluated model on the distorted set against the true labels "
    "of the originals (not conditioned on the clean prediction).",
    "A10 (noise): x + N(0, stddev^2), not clipped to [0,1] (so the measured distortion equals the stddev); "
    "the measured distortion is reported.",
    "A11 (magnification): x + 0.1 (x'-x)/RMS(x'-x), i.e. the perturbation rescaled to an RMS of 0.1 (the "
    "printed L2 formula would give RMS 0.0036), not clipped. The Table 4 upper noise row uses the measured "
    "mean distortion of the three sets (the paper's 0.06) unless a stddev is given.",
    "A12-A16 (models): see intriguing_jax.train / notes; P1 = first 30000, P2 = last 30000 training images; "
    "the three Table 3 networks share lambda = 1e-5, 1e-5, 1e-6 and differ in data, size and seed.",
)
