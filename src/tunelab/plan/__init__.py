"""Memory, time and cost planner (`tunelab plan`)."""
