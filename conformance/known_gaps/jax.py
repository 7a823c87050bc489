"""Known gaps of the JAX backend (``gipo_core.jax``): strict xfails, each with its reason."""

GAPS = [
    (
        "test_bad_input_raises[[]jax-*-mixed-libraries[]]",  # fnmatch: [[] and []] are literal brackets
        "by design gipo_core.jax converts NumPy arrays to JAX arrays, as jax.numpy functions do (an old_logp "
        "from a NumPy replay buffer next to a traced logp is the common case); the driver's `foreign` array "
        "for JAX is a NumPy array, so no TypeError is raised. Arrays of other libraries are still refused "
        "(tests/test_jax.py::test_errors_name_the_function_and_argument_under_jit).",
    ),
]
