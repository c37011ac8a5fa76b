"""Memory, time and cost planner (`tunelab plan`)."""

from tunelab._callable import callable_package

callable_package(__name__, "plan")  # tunelab.plan(...) is the API function (tunelab.api.plan)
