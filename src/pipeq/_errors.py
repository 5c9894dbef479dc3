"""Exceptions that both cores raise."""


class StreamError(ValueError):
    """The bytes in the queue's pipe are not a valid pipeq frame.

    Raised by ``get()`` instead of unpickling noise or a huge allocation when
    something other than pipeq wrote into the pipe.
    """
