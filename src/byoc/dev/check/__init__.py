"""``byoc check``: the Livepeer BYOC production checklist run against a container."""
