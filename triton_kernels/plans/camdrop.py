def plan_camdrop(*a, **k):
    raise NotImplementedError
