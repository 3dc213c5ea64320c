"""The paper's tasks as library code: data -> client arrays, model and layout, problem,
samplers, mask functions, metrics and op prices (hyper_representation, hyper_cleaning), and the
theory check's sweep on bilevel.theory's problems (coverage_rate)."""
