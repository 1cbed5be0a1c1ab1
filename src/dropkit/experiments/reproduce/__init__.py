"""``dropkit reproduce``: the published claims about dropout, reproduced on one command."""
