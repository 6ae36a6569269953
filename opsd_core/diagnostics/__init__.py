"""KL gap (paper Eq. 4), gap closure (Eq. 9), the noise control, and run reports."""
