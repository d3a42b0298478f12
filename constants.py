"""Project-wide constants of GlaUnTI (docs/model.md, docs/data_format.md).

Physical and dataset constants live here so that every module uses one value for one thing.
``data_folder`` is the last fallback of the data-folder resolution order
(``--data_folder`` > ``GLAUNTI_DATA_FOLDER`` > this value).
"""

# Where the dataset lives when neither --data_folder nor GLAUNTI_DATA_FOLDER is given.
# `make demo` writes the synthetic twin here.
data_folder = "data/demo"

# Where preprocessed tensors are cached (relative paths are relative to the data folder).
cache_folder = ".glaunti_cache"

initialisation_period_start_year = 1990
study_period_start_year = 1995

test_fold = 0
val_fold = 1

# Lapse rate used to downscale reanalysis temperature to the DEM (degC per m).
lapse_rate = -0.0060

# Date weight of stakes: exp(-(delta/tau)^2) per end (days).
stake_date_tau = 6.355375070295649

# Normalisation divisors of the corrector / GRU inputs: the published dataset-wide values the
# published weights were trained with. This is their one home. The models divide by them; a
# dataset's normalisation_factors.pkl (written from them by dataloader.layout) must hold the same
# values, which dataloader.dataset checks before the reader normalises the monthly climate.
elevation_norm = 4341.383118842848
elevation_std_norm = 5699.1201273232155
t_monthly_norm = 45.744850158691406
p_monthly_norm = 0.16851751506328583

facies_bands = (
    "ice", "snow", "debris", "firn", "shadow", "superimposed-ice", "cloud", "water", "confidence",
)
facies_placeholder = -1.0

# A temporary file or build folder untouched for this long belongs to a killed process and may
# be removed (a live writer, even of a large NetCDF, touches its file far more often).
abandoned_temporary_age_s = 3600

# Smallest grid side the corrector accepts (three 2x2 poolings), docs/model.md §9.9.
min_grid_side = 8

# The seasons of a balance year, in the order of the glacier-wide balance columns
# (GlacierTensors.glacier_wide) and of the model outputs.
balance_codes = ("annual", "winter", "summer")
# `balance_code` of a stake reading (point_smb.csv); GlacierTensors.stake_code is the position in
# this tuple. 'index' readings (intermediate probings) are evaluated but never calibrated on.
stake_codes = (*balance_codes, "index")
index_stake_code = stake_codes.index("index")  # 3
