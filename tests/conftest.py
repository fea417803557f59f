"""Markers that choose parts of the suite. The whole suite, ``python -m pytest -q``, stays the README's and
CI's command; these are for working on the pack:

    python -m pytest -q -m quick                  # the quick subset: under a minute on 2 cores
    python -m pytest -q -m "not multiprocess"     # everything that starts no process
    python -m pytest -q -m comfyui                # the live ComfyUI tests (they skip without COMFYUI_DIR)
    python -m pytest -q -m slow                   # the slow in-process tests

- ``multiprocess``: starts processes (torch.distributed worlds, MAGI-1 Multi-GPU's workers, the CLI or
  torchrun in a subprocess);
- ``comfyui``: needs a ComfyUI checkout (``COMFYUI_DIR``, see docs/testing.md);
- ``slow``: an in-process test of about a second or more on 2 cores (measured with ``--durations=0``;
  a new slow test joins ``SLOW`` below);
- ``quick``: every other test.
"""

import pytest

MULTIPROCESS_FILES = {"test_parallel.py", "test_workers.py"}
MULTIPROCESS = {
    "test_cli.py": {"test_a_base_checkpoint_with_negative_prompt_and_guidance",
                    "test_caption_states_file_gives_the_prompts_latent", "test_help_documents_every_option",
                    "test_process_count_must_fit_cfg_parallel", "test_the_program_is_not_part_of_the_imported_package",
                    "test_torchrun_two_processes_in_two_guidance_groups"},
    "test_package.py": {"test_importing_the_pack_outside_comfyui_is_silent_and_registers_nothing",
                        "test_train_is_not_a_runtime_package"},
    "test_activation_blocks.py": {"test_context_parallel_blocks_match_one_whole_process"},
    "test_demo_cli.py": {"test_tiny_demo_end_to_end"},
}
COMFYUI_FILES = {"test_comfyui.py"}
COMFYUI = {"test_templates.py": {"test_comfyui_lists_the_workflows_as_templates"}}
SLOW = {
    "test_cli.py": {"test_writes_a_playable_mp4_and_a_report", "test_latent_is_what_generate_makes_of_the_same_inputs"},
    "test_preview.py": {"test_the_sampler_node_sends_previews_with_a_preview_vae"},
    "test_queue_checks.py": {"test_the_sampler_refuses_what_it_would_drop_and_names_what_it_ignores"},
    "test_sampler_cache.py": {"test_same_seed_same_video_and_runs_share_no_state"},
    "test_continuity.py": {"test_the_command_measures_a_model_and_real_scenes"},
    "test_streaming.py": {"test_streamed_generation_equals_resident"},
    "test_sparse_efficiency.py": {"test_a_short_run_on_the_tiny_model"},
    "test_bench_setup.py": {"test_the_benchmark_model_runs_the_policy_benchmark"},
    "test_tiny.py": {"test_policy_benchmark_quick_run_writes_table_and_plot",
                     "test_calibration_sweep_runs_the_default_policy_over_the_fine_grid",
                     "test_training_script_runs_a_few_steps", "test_an_interrupted_training_resumes_to_the_same_weights"},
    "test_gpu_suite.py": {"test_smoke_run_covers_every_section_and_the_goals"},
    "test_activation_blocks.py": {"test_measured_peak_falls_and_stays_under_the_plan",
                                  "test_blocks_give_the_whole_call_up_to_rounding"},
    "test_vae_streaming.py": {"test_any_split_equals_the_whole_decode"},
    "test_long_video.py": {"test_a_long_video_is_the_one_a_whole_video_cache_makes",
                           "test_a_prefix_video_longer_than_the_cache_is_encoded_in_pieces",
                           "test_chunk_captions_give_the_video_of_their_dense_rows",
                           "test_the_device_window_of_the_latent_gives_the_same_video"},
    "test_regression.py": {"test_generation_is_unchanged"},
}
MARKERS = {
    "multiprocess": "starts processes (torch.distributed, workers, the CLI in a subprocess)",
    "comfyui": "needs a ComfyUI checkout (COMFYUI_DIR)",
    "slow": "an in-process test of about a second or more on 2 cores",
    "quick": "none of the above: the quick subset",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def _named(table, files, item):
    file, test = item.path.name, item.originalname or item.name
    return file in files or test in table.get(file, ())


def pytest_collection_modifyitems(config, items):
    for item in items:
        kinds = [kind for kind, table, files in (("multiprocess", MULTIPROCESS, MULTIPROCESS_FILES),
                                                   ("comfyui", COMFYUI, COMFYUI_FILES), ("slow", SLOW, set()))
                 if _named(table, files, item)]
        for kind in kinds or ["quick"]:
            item.add_marker(getattr(pytest.mark, kind))
