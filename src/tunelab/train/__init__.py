from tunelab._callable import callable_package

callable_package(__name__, "train")  # tunelab.train(...) is the API function (tunelab.api.train)
