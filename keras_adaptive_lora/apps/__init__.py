"""Applications built on the library: jobs that use adapters, never imported
by the library itself (`keras_adaptive_lora.apps.transfer`: the main job)."""
