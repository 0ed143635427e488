"""The sample catalog: emoji artwork and names from installed packages, turned into a
catalog that follows the data contract (used by the `catalog` step only).

May import `components.contract`, `components.config`, `components.errors`,
`components.core`, `components.io` and `components.sample`.
"""
