"""Getting a trained model out to where it is served: merged folders, GGUF, Ollama, the Hub.

- `source`: the model a run (or a model / adapter folder) stands for, merged in fp32;
- `gguf_writer`: a Llama-family causal LM as one GGUF file (the `gguf` package's writer);
- `ollama`: a Modelfile whose template reproduces the training render (`go_template` renders it);
- `check`: every merge and export ends with a comparison against the source model;
- `push`: what goes to the Hugging Face Hub (`huggingface_hub`), with an offline plan of it.
"""
