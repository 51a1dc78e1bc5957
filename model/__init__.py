"""The transformer: small Linen modules, one per concept, with logical axis names on every param."""
