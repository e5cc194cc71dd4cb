"""lm-eval tasks that run offline: YAML files read by lm-eval's TaskManager, and
plays.py, which builds their documents (lm-eval imports it by path, through the YAML's
`!function plays.<builder>`)."""
