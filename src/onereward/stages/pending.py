from onereward.stages import StageContext, StageNotImplemented


def not_implemented(ctx: StageContext) -> dict[str, float]:
    raise StageNotImplemented(f"stage {ctx.stage!r} is not implemented yet")
