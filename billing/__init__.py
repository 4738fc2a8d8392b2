"""The billing domain (pure rules and the delivery driver): identifiers, values and carry, retries, what to send and what each answer leads to, reconciliation."""
