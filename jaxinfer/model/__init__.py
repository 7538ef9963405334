"""Dense Llama-family decoder: parameters, layers, attention and the forward passes."""
