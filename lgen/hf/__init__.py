"""The Hugging Face side: finding and loading models, tokenizers and adapters (:mod:`.models`), the
generation config (:mod:`.generation`), weight precision (:mod:`.precision`) and DeepSpeed ZeRO-3
(:mod:`.zero3`)."""
