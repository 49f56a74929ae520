"""Measuring: the step timer, probes (saved activations, model state, pipeline bubble, where a
step's time goes), the collective sweep, and the layouts ``plan --validate`` trains. Used by
`clusterlm bench` and `clusterlm plan --validate`; the planner itself stays pure arithmetic."""
