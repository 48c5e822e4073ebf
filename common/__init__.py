"""The ground floor: what every package of communs may use and nothing of ours is below.

`common.errors` (UserError), `common.io` (atomic writes, folder swaps, hashing, strict JSON-lines),
`common.suggest` (did-you-mean). It imports the standard library only.
"""
