"""Energy training against a frozen VAE, one loop for every method: the loop (`loop`), the objective and clip
(`objective`), the replay buffer (`replay`), joint generator fine-tuning (`finetune`) and the trained models read
back from run directories (`sources`)."""
