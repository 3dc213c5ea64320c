"""The paper's tasks as library code: data -> client arrays, model and layout, problem,
samplers, mask functions, metrics and op prices (hyper_representation, hyper_cleaning), and the
theory check: synthetic problems with a known Phi and coverage schedules (theory), its sweep
(coverage_rate)."""
