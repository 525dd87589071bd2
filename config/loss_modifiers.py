# Loss modifier configuration
loss_modifiers_enabled = True

# Entropy modifier
entropy_modifier_enabled = True
entropy_modifier_weight = 1.2
entropy_modifier_use_for_weighting = True
entropy_modifier_threshold = 0.1

# Target smoothing
target_smoothing_enabled = True
target_smoothing_factor = 0.1
target_smoothing_special_tokens = [0, 1, 2]  # Exclude special tokens

# Mask ratio weighting
mask_ratio_weight_enabled = False  # Disabled for this experiment
