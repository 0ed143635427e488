"""Errors shared by steps and the CLI."""


class StepFailed(RuntimeError):
    """A step ran and decided the run must stop (too many bad rows, a failed gate).

    Its outputs (reports) are written before it is raised, so the failure can be inspected.
    `report`, when given, is a readable account (a gate table) the CLI prints on stdout.
    """

    def __init__(self, message: str, report: str | None = None) -> None:
        super().__init__(message)
        self.report = report
