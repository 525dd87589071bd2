# Example config for `losskit train config/diffusion_digits.py` (docs/diffusion.md):
# the digits denoiser with min-SNR-gamma weighting (Hang et al. 2023), epsilon prediction.
task = "diffusion"

schedule = "cosine"
num_timesteps = 1000

loss_modifiers_enabled = True
loss_weighting = "min_snr"
min_snr_gamma = 5.0
prediction_type = "epsilon"
