"""ATP-LLaVA integration layer (Hugging Face LLaVA -> ATP-LLaVA). Built on atp_ops."""
