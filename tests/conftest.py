"""Test configuration: 8 host CPU devices for the sync tests, set before JAX starts."""

import os

import jax

jax.config.update('jax_num_cpu_devices', 8)

from hypothesis import settings  # noqa: E402

# CI runs hundreds of examples per property; locally the default profile is
# the same, and BNJAX_HYPOTHESIS=dev gives a quick pass.
settings.register_profile('ci', max_examples=200, deadline=None,
                          derandomize=True, print_blob=True)
settings.register_profile('dev', max_examples=30, deadline=None)
settings.load_profile(os.environ.get('BNJAX_HYPOTHESIS', 'ci'))
