"""The frozen backbone (loading, ZeRO-3 wrapping) and the soft prompts that steer it."""
