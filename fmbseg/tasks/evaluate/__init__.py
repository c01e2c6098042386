"""The evaluation protocol (sliding-window mIoU) and the pseudo-label quality report."""
