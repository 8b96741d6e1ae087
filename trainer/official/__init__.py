"""Import of the official NVAE (`nvae`) and VAEBM energy (`ebm`) checkpoints into ordinary run directories, loaded
without unpickling arbitrary objects (`common`)."""
