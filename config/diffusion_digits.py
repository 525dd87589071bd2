# Example config for `losskit train config/diffusion_digits.py` (spec/diffusion.md §9):
# the digits denoiser with min-SNR-gamma weighting (Hang et al. 2023), epsilon prediction.
task = "diffusion"
out_dir = "out/diffusion_min_snr"

schedule = "cosine"
num_timesteps = 1000

loss_modifiers_enabled = True
loss_weighting = "min_snr"
min_snr_gamma = 5.0
prediction_type = "epsilon"
