// placeholder: replaced by the SDK bundle (scripts/check-demo-bundle.sh --update)
export class Lockstep {}
export class LockstepError extends Error {}
