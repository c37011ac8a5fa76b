from tunelab._callable import callable_package

callable_package(__name__, "evaluate")  # tunelab.evaluate(...) is the API function (tunelab.api.evaluate)
